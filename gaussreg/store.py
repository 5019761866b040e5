"""The README's name `gaussreg.store`: the module is `gaussreg.runs.store` (moved when the
package was split into layers); this name stays the same module object, so attributes
and monkeypatches reach the real one."""
import sys

from gaussreg.runs import store as _module

sys.modules[__name__] = _module
