"""`python -m gaussreg.worker RUN_DIR` (the README's, and in scripts users wrote) and the name
`gaussreg.worker`: the worker is `gaussreg.runs.worker` since the package was split into layers."""
import sys

from gaussreg.runs import worker as _module

if __name__ == "__main__":
    _module.run_as_script()
else:
    sys.modules[__name__] = _module
