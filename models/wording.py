"""How a class name is worded in the text prompt "X <name>".

The official code rewords a few MVTec-AD and VisA class names; every name is then lower-cased.
Datasets added later can word more names through their registry row (``wording`` in
``dataset/registry.py``), which the evaluation and training pass to the model.
"""

from __future__ import annotations

from typing import Mapping

# Class names as the official code words them in the text prompt.
OFFICIAL_WORDING = {
    "macaroni1": "macaroni", "macaroni2": "macaroni",
    "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut",
}


def prompt_class_name(name: str, extra: Mapping[str, str] | None = None) -> str:
    """The words of class ``name`` in the prompt: ``extra``'s wording, else the official one,
    lower-cased."""
    if extra and name in extra:
        return extra[name].lower()
    return OFFICIAL_WORDING.get(name, name).lower()
