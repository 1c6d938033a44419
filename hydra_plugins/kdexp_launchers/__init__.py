"""kdexp's Hydra launcher plugin. Hydra instantiates a launcher only from a class in the ``hydra_plugins``
package, so the class ``conf/hydra/launcher/slurm.yaml`` names lives here; its code is in
:mod:`kdexp.grid.slurm`."""

try:
    from kdexp.grid.slurm import WatchedSlurmLauncher as _WatchedSlurmLauncher
except ImportError:  # hydra-submitit-launcher is not installed: `kdexp sweep --launcher slurm` says how to get it
    _WatchedSlurmLauncher = None

if _WatchedSlurmLauncher is not None:

    class WatchedSlurmLauncher(_WatchedSlurmLauncher):
        """:class:`kdexp.grid.slurm.WatchedSlurmLauncher`, where Hydra looks for launchers."""
