"""The README's name `gaussreg.adf`: the module is `gaussreg.science.adf` (moved when the
package was split into layers); this name stays the same module object, so attributes
and monkeypatches reach the real one."""
import sys

from gaussreg.science import adf as _module

sys.modules[__name__] = _module
