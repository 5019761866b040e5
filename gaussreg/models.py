"""The README's name `gaussreg.models`: the module is `gaussreg.science.models` (moved when the
package was split into layers); this name stays the same module object, so attributes
and monkeypatches reach the real one."""
import sys

from gaussreg.science import models as _module

sys.modules[__name__] = _module
