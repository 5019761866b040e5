"""Starting and stopping runs: the launch request, the GPU inventory, the local scheduler,
run control (cancel, restart, detached launches) and Slurm."""
