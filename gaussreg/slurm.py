"""`python -m gaussreg.slurm task ...`, which sbatch scripts written before the package was split
into layers call, and the name `gaussreg.slurm`: the module is `gaussreg.launch.slurm`."""
import sys

from gaussreg.launch import slurm as _module

if __name__ == "__main__":
    sys.exit(_module.main())
else:
    sys.modules[__name__] = _module
