"""The README's name `gaussreg.datasets`: the module is `gaussreg.data.datasets` (moved when the
package was split into layers); this name stays the same module object, so attributes
and monkeypatches reach the real one."""
import sys

from gaussreg.data import datasets as _module

sys.modules[__name__] = _module
