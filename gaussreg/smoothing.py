"""The README's name `gaussreg.smoothing`: the module is `gaussreg.science.smoothing` (moved when the
package was split into layers); this name stays the same module object, so attributes
and monkeypatches reach the real one."""
import sys

from gaussreg.science import smoothing as _module

sys.modules[__name__] = _module
