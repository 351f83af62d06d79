"""The project's top-level scripts as modules, for tests that call their ``main(argv)``.

They are loaded from their files: ``import test`` would find the standard library's ``test``
package. Each call gives a fresh module.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    """The module of ``<repository>/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"bayes_pfl_script_{name}",
                                                  os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
