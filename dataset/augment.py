"""The official Bayes-PFL training augmentation (albumentations 1.3.1 semantics), cv2 + numpy.

Official pipeline (datasets.py:102-112), run at the image's original resolution:

    Compose([Rotate(limit=30, p=.5), RandomRotate90(p=.5), RandomBrightnessContrast(p=.5),
             GaussNoise(p=.5), OneOf([Blur(blur_limit=3, p=.5), ColorJitter(p=.5),
                                      GaussianBlur(p=.5)], p=.5)])

on **BGR** uint8 H x W x 3 (``np.array(pil_rgb)[:, :, ::-1]``) and the uint8 0/255 H x W mask,
flipped back to RGB after; ``augment_rgb`` does both flips and rejects 2-D (mode "L") images,
which fail in the official code too.

Draw order (one ``random.Random``; every numpy draw uses a fresh
``np.random.RandomState(rng.randint(0, 2**32 - 1))``, so numpy's global seed plays no part):
Compose ``random() < 1.0``; then per transform ``random() < p`` followed by its own draws:
Rotate ``angle = uniform(-30, 30)``; RandomRotate90 ``k = randint(0, 3)`` (k = 0 is drawn a
quarter of the time); RandomBrightnessContrast ``alpha = 1 + uniform(-.2, .2)``,
``beta = uniform(-.2, .2)``; GaussNoise ``sigma = uniform(10, 50) ** .5`` then the noise seed
(noise shape = image shape *after* RandomRotate90, H and W swapped for odd k); OneOf: the
RandomState seed, ``choice(3, p=[1/3] * 3)``, then the chosen child's own ``random() < .5``
(drawn, but ignored: it is force-applied), then its draws: Blur ``choice([3])``; ColorJitter
brightness, contrast, saturation ``uniform(.8, 1.2)``, hue ``uniform(-.2, .2)``,
``shuffle([0, 1, 2, 3])``; GaussianBlur ``randrange(3, 8)`` (even -> +1, so ksize 3 / 5 / 7
with probability 1/5, 2/5, 2/5), ``sigma = uniform(0, 0) = 0``.

Semantics worth knowing: brightness/contrast and colour-jitter LUTs and the noise **truncate**
to uint8 (no rounding); the mask only follows Rotate (nearest, reflect-101 border: the mask
is mirrored into the corners, not zero-filled) and RandomRotate90; ColorJitter assumes RGB but
sees BGR (grey weights blue 0.299, a hue shift h acts like -h on the RGB picture). OpenCV 5.0
computes warpAffine's bilinear in float (up to 6 levels off 4.9) and addWeighted depends on
FMA hardware, so rotation, RGB2GRAY and addWeighted are numpy with OpenCV 4.9's fixed-point /
float32-FMA formulas; LUT, blur, GaussianBlur (bit-exact fixed point) and the 8-bit HSV
conversions are cv2's. All bit-exact with the golden file of albumentations 1.3.1 + OpenCV 4.9.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import cv2
import numpy as np

# The OpenCV versions with which the augmentation is bit-equal to the official pipeline (its
# requirements: opencv-python 4.9.0.80): 4.10 (NumPy 2) to 4.13. OpenCV 4.14 and 5 round the
# rotation and the colour jitter differently (1 to 2 levels on about a sixth of the values).
OFFICIAL_OPENCV_MAJOR = 4
OPENCV_BIT_EQUAL = ((4, 10), (4, 14))          # from, up to (excluded)

ONEOF_CHILDREN = ("Blur", "ColorJitter", "GaussianBlur")
_U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class NoiseParams:
    """GaussNoise: the array is ``RandomState(seed).normal(0, sigma, shape)``, float64."""
    sigma: float
    seed: int
    shape: tuple[int, ...]

    def array(self) -> np.ndarray:
        """The noise, float64 ``shape`` ([H, W, 3])."""
        return np.random.RandomState(self.seed).normal(0.0, self.sigma, self.shape)


@dataclass(frozen=True)
class ColorJitterParams:
    """Factors (identity 1, 1, 1, 0) and the order (0 brightness .. 3 hue) they apply in."""
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]


@dataclass(frozen=True)
class AugmentParams:
    """What fired (None = skipped) and with which parameters.

    ``oneof_seed`` is the RandomState seed of OneOf's child choice (None if OneOf skipped);
    exactly one of ``blur_ksize``, ``color_jitter``, ``gaussian_blur`` (ksize, sigma) is set
    when OneOf fires.
    """
    angle: float | None = None
    k: int | None = None
    alpha: float | None = None
    beta: float | None = None
    noise: NoiseParams | None = None
    oneof_seed: int | None = None
    blur_ksize: int | None = None
    color_jitter: ColorJitterParams | None = None
    gaussian_blur: tuple[int, float] | None = None

    @property
    def oneof_child(self) -> str | None:
        """Name of the OneOf child that fired, or None."""
        values = (self.blur_ksize, self.color_jitter, self.gaussian_blur)
        return next((n for n, v in zip(ONEOF_CHILDREN, values) if v is not None), None)

    @property
    def randomstate_seeds(self) -> list[int]:
        """The numpy RandomState seeds, in draw order (GaussNoise, OneOf)."""
        seeds = (None if self.noise is None else self.noise.seed, self.oneof_seed)
        return [s for s in seeds if s is not None]

    def fired(self) -> list[tuple[str, dict]]:
        """[(albumentations transform name, params)] in pipeline order, for logging."""
        n, cj, gb = self.noise, self.color_jitter, self.gaussian_blur
        items = [
            ("Rotate", self.angle, lambda: {"angle": self.angle}),
            ("RandomRotate90", self.k, lambda: {"factor": self.k}),
            ("RandomBrightnessContrast", self.alpha,
             lambda: {"alpha": self.alpha, "beta": self.beta}),
            ("GaussNoise", n,
             lambda: {"sigma": n.sigma, "randomstate_seed": n.seed, "shape": list(n.shape)}),
            ("Blur", self.blur_ksize, lambda: {"ksize": self.blur_ksize}),
            ("ColorJitter", cj, lambda: {**asdict(cj), "order": list(cj.order)}),
            ("GaussianBlur", gb, lambda: {"ksize": gb[0], "sigma": gb[1]}),
        ]
        return [(name, make()) for name, value, make in items if value is not None]


def opencv_warning(version: str | None = None) -> str | None:
    """None when OpenCV ``version`` (default: the installed one) is one with which the
    augmentation is bit-equal to the official pipeline (``OPENCV_BIT_EQUAL``), else the
    one-line warning saying so, with the install command that makes it so."""
    version = cv2.__version__ if version is None else version
    (lo, hi) = OPENCV_BIT_EQUAL
    try:
        number = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        number = None
    if number is not None and lo <= number < hi:
        return None
    return (f"OpenCV {version} is installed, not OpenCV {lo[0]}.{lo[1]} to {hi[0]}.{hi[1] - 1} "
            f"(OpenCV {OFFICIAL_OPENCV_MAJOR}, the official code's): the training augmentation "
            f"is not bit-equal to the official pipeline; pip install "
            f"'opencv-python-headless>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}' restores it")


def draw_params(rng: random.Random, shape: tuple[int, ...]) -> AugmentParams:
    """Draw one Compose call's parameters for an input image of shape (H, W) or (H, W, C)
    (C = 3 if omitted); the noise gets the shape after RandomRotate90."""
    cur = (int(shape[0]), int(shape[1]), int(shape[2]) if len(shape) > 2 else 3)
    p: dict = {}
    rng.random()  # Compose(p=1.0): `random() < 1.0`, always true, but it consumes a draw
    if rng.random() < 0.5:
        p["angle"] = rng.uniform(-30, 30)
    if rng.random() < 0.5:
        p["k"] = rng.randint(0, 3)
        if p["k"] % 2:
            cur = (cur[1], cur[0], cur[2])
    if rng.random() < 0.5:
        p["alpha"] = 1.0 + rng.uniform(-0.2, 0.2)
        p["beta"] = 0.0 + rng.uniform(-0.2, 0.2)
    if rng.random() < 0.5:
        sigma = rng.uniform(10.0, 50.0) ** 0.5
        p["noise"] = NoiseParams(sigma, rng.randint(0, _U32_MAX), cur)
    if rng.random() < 0.5:
        p["oneof_seed"] = seed = rng.randint(0, _U32_MAX)
        child_p = [0.5, 0.5, 0.5]  # normalised into the choice weights 1/3 each
        idx = int(np.random.RandomState(seed).choice(3, p=[c / sum(child_p) for c in child_p]))
        rng.random()  # the child's own `random() < p`: drawn, then overridden by force_apply
        if idx == 0:
            p["blur_ksize"] = int(rng.choice([3]))
        elif idx == 1:
            b, c, s = (rng.uniform(1 - 0.2, 1 + 0.2) for _ in range(3))  # in this order
            hue, order = rng.uniform(-0.2, 0.2), [0, 1, 2, 3]
            rng.shuffle(order)
            p["color_jitter"] = ColorJitterParams(b, c, s, hue, tuple(order))
        else:
            ksize = rng.randrange(3, 8)
            if ksize % 2 == 0:
                ksize = (ksize + 1) % 8
            p["gaussian_blur"] = (ksize, rng.uniform(0, 0))
    return AugmentParams(**p)


# ----------------------------------------------------------------------------- geometric
def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's borderInterpolate(BORDER_REFLECT_101) for any integer index array."""
    if n == 1:
        return np.zeros_like(idx)
    idx = np.mod(idx, 2 * n - 2)
    return np.where(idx >= n, 2 * n - 2 - idx, idx)


def _fixed_point_map(angle: float, h: int, w: int, frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV warpAffine's source coordinates [H, W] (int32) with ``frac_bits`` fraction bits.

    Inverse of getRotationMatrix2D((W/2 - .5, H/2 - .5), angle, 1) as OpenCV inverts it; per
    pixel ``(rint(1024 (m01 y + m02)) + round_delta + rint(1024 m00 x)) >> (10 - frac_bits)``.
    """
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0).reshape(-1)
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22, a12, a21 = m[4] * det, m[0] * det, m[1] * -det, m[3] * -det
    b1 = -a11 * m[2] - a12 * m[5]
    b2 = -a21 * m[2] - a22 * m[5]
    x, y = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    delta = 1 << (9 - frac_bits)  # AB_SCALE / 2**frac_bits / 2
    shift = 10 - frac_bits
    x0 = (np.rint((a12 * y + b1) * 1024) + delta).astype(np.int32)
    y0 = (np.rint((a22 * y + b2) * 1024) + delta).astype(np.int32)
    xs = (x0[:, None] + np.rint(a11 * x * 1024).astype(np.int32)[None, :]) >> shift
    ys = (y0[:, None] + np.rint(a21 * x * 1024).astype(np.int32)[None, :]) >> shift
    return xs, ys


def _extend(image: np.ndarray, xs: np.ndarray, ys: np.ndarray,
            extra: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Reflect-101-extend ``image`` [H, W(, C)] to cover the integer coordinates (+ ``extra``
    right and below); returns (planes [C, N], flat index of (ys, xs) [H, W], row stride)."""
    h, w = image.shape[:2]
    planes = image.reshape(h, w, -1).transpose(2, 0, 1)
    y_lo, x_lo = int(ys.min()), int(xs.min())
    rows = _reflect101(np.arange(y_lo, int(ys.max()) + extra + 1), h)
    cols = _reflect101(np.arange(x_lo, int(xs.max()) + extra + 1), w)
    ext = np.take(np.take(planes, rows, axis=1), cols, axis=2)
    stride = ext.shape[2]
    flat = (ys - y_lo) * stride + (xs - x_lo)
    return ext.reshape(ext.shape[0], -1), flat, stride


def _warp_linear_u8(image: np.ndarray, angle: float) -> np.ndarray:
    """warpAffine INTER_LINEAR + BORDER_REFLECT_101, OpenCV 4.9 uint8 fixed point: fractions
    a, b in 1/32 px, weights 32 (32 - a)(32 - b) etc., ``(sum w v + 2**14) >> 15``."""
    h, w = image.shape[:2]
    xs, ys = _fixed_point_map(angle, h, w, 5)
    ax, ay = xs & 31, ys & 31
    bx, by = 32 - ax, 32 - ay
    planes, flat, stride = _extend(image, xs >> 5, ys >> 5, 1)
    out = np.empty((planes.shape[0], h, w), np.uint8)
    for c, plane in enumerate(planes):
        v00, v01, v10, v11 = (np.take(plane, flat + off).astype(np.int32)
                              for off in (0, 1, stride, stride + 1))
        # 32 ((32 - b) top + b bottom) + 2**14 >> 15  ==  ((32 - b) top + b bottom + 512) >> 10
        out[c] = (by * (bx * v00 + ax * v01) + ay * (bx * v10 + ax * v11) + 512) >> 10
    return np.ascontiguousarray(out.transpose(1, 2, 0)).reshape(image.shape)


def _warp_nearest(image: np.ndarray, angle: float) -> np.ndarray:
    """warpAffine INTER_NEAREST + BORDER_REFLECT_101, OpenCV 4.9 fixed point (1/1024 px)."""
    h, w = image.shape[:2]
    xs, ys = _fixed_point_map(angle, h, w, 0)
    planes, flat, _ = _extend(image, xs, ys, 0)
    out = np.stack([np.take(plane, flat) for plane in planes], axis=-1)
    return out.reshape(image.shape)


def rotate(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate: image [H, W(, C)] uint8 bilinear, mask [H, W] nearest; angle in degrees, > 0 is
    counter-clockwise about (W/2 - .5, H/2 - .5), same size, reflect-101 borders for both."""
    return _warp_linear_u8(image, angle), _warp_nearest(mask, angle)


def rot90(image: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """np.rot90 by k (0..3) of image [H, W(, C)] and mask; odd k gives [W, H(, C)]."""
    return np.ascontiguousarray(np.rot90(image, k)), np.ascontiguousarray(np.rot90(mask, k))


# ----------------------------------------------------------------------------- photometric
def brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``image * alpha + beta * 255`` through a float32 LUT, clipped, truncated to uint8."""
    lut = np.arange(256).astype(np.float32)
    if alpha != 1:
        lut *= np.float32(alpha)
    if beta != 0:
        lut += np.float32(beta * 255)
    return cv2.LUT(image, np.clip(lut, 0, 255).astype(np.uint8))


def gauss_noise(image: np.ndarray, gauss: np.ndarray) -> np.ndarray:
    """``float32(image) + gauss`` (float64, same shape), clipped to [0, 255], truncated."""
    return np.clip(image.astype(np.float32) + gauss, 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """cv2.blur ksize x ksize mean, reflect-101 border."""
    return cv2.blur(np.ascontiguousarray(image), (ksize, ksize))


def gaussian_blur(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur (bit-exact fixed point for uint8), sigma 0 = from ksize."""
    return cv2.GaussianBlur(np.ascontiguousarray(image), (ksize, ksize), sigmaX=sigma)


def rgb2gray_u8(image: np.ndarray) -> np.ndarray:
    """cv2 RGB2GRAY on uint8 [H, W, 3]: ``(9798 c0 + 19235 c1 + 3735 c2 + 16384) >> 15``."""
    c = image.astype(np.int32)
    gray = (9798 * c[..., 0] + 19235 * c[..., 1] + 3735 * c[..., 2] + 16384) >> 15
    return gray.astype(np.uint8)


def add_weighted_u8(a: np.ndarray, fa: float, b: np.ndarray, fb: float) -> np.ndarray:
    """cv2.addWeighted(a, fa, b, fb, 0) on uint8 as OpenCV 4.9 (AVX2) computes it:
    ``rint(float32 fma(a, fa, float32(b * fb)))`` (float64 holds the fma exactly), saturated."""
    bf = (b.astype(np.float32) * np.float32(fb)).astype(np.float64)
    t = (a.astype(np.float64) * np.float64(np.float32(fa)) + bf).astype(np.float32)
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """LUT ``clip(arange(256) * factor)`` (float64), truncated; identity at 1."""
    if factor == 1:
        return image
    return cv2.LUT(image, np.clip(np.arange(256) * factor, 0, 255).astype(np.uint8))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """LUT ``clip(arange * f + mean(gray) (1 - f))``, truncated; gray = RGB2GRAY of the array."""
    if factor == 1:
        return image
    mean = rgb2gray_u8(image).mean()
    lut = np.arange(256) * factor + mean * (1 - factor)
    return cv2.LUT(image, np.clip(lut, 0, 255).astype(np.uint8))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """addWeighted(image, f, gray broadcast to 3 channels, 1 - f); identity at 1."""
    if factor == 1:
        return image
    gray = np.repeat(rgb2gray_u8(image)[..., None], 3, axis=2)
    return add_weighted_u8(image, factor, gray, 1 - factor)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """cv2 8-bit RGB2HSV, H -> (H + 180 f) mod 180 truncated, HSV2RGB; identity at 0."""
    if factor == 0:
        return image
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    lut = np.mod(np.arange(256, dtype=np.int16) + 180 * factor, 180).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue: float, order: tuple[int, ...] | list[int]) -> np.ndarray:
    """ColorJitter, uint8 [H, W, 3]: 0 brightness, 1 contrast, 2 saturation, 3 hue, in ``order``."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    factors = (brightness, contrast, saturation, hue)
    for i in order:
        image = ops[i](image, factors[i])
    return np.ascontiguousarray(image)


# ----------------------------------------------------------------------------- pipeline
def apply_params(image_bgr: np.ndarray, mask: np.ndarray,
                 params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Apply params to a BGR uint8 [H, W, 3] image and uint8 [H, W] mask; C-contiguous out."""
    image, mask = np.ascontiguousarray(image_bgr), np.ascontiguousarray(mask)
    if params.angle is not None:
        image, mask = rotate(image, mask, params.angle)
    if params.k is not None:
        image, mask = rot90(image, mask, params.k)
    if params.alpha is not None:
        image = brightness_contrast(image, params.alpha, params.beta)
    if params.noise is not None:
        if tuple(image.shape) != params.noise.shape:
            raise ValueError(f"noise shape {params.noise.shape} != image shape {image.shape}")
        image = gauss_noise(image, params.noise.array())
    if params.blur_ksize is not None:
        image = box_blur(image, params.blur_ksize)
    if params.color_jitter is not None:
        cj = params.color_jitter
        image = color_jitter(image, cj.brightness, cj.contrast, cj.saturation, cj.hue, cj.order)
    if params.gaussian_blur is not None:
        image = gaussian_blur(image, *params.gaussian_blur)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def official_augment(image_bgr: np.ndarray, mask: np.ndarray,
                     rng: random.Random) -> tuple[np.ndarray, np.ndarray, AugmentParams]:
    """Draw then apply. ``image_bgr`` is BGR (official: ``np.array(pil_rgb)[:, :, ::-1]``)."""
    params = draw_params(rng, image_bgr.shape)
    image, mask = apply_params(image_bgr, mask, params)
    return image, mask, params


def augment_rgb(image_rgb: np.ndarray, mask: np.ndarray,
                rng: random.Random) -> tuple[np.ndarray, np.ndarray, AugmentParams]:
    """As the official Trans: RGB [H, W, 3] -> BGR, augment, -> RGB; returns (rgb, mask, params)."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"augment_rgb expects an H x W x 3 image, got shape {image_rgb.shape}")
    image, mask, params = official_augment(np.ascontiguousarray(image_rgb[:, :, ::-1]), mask, rng)
    return np.ascontiguousarray(image[:, :, ::-1]), mask, params
