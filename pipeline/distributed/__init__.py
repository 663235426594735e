"""Everything that imports Ray (except data readers and finetune/): joining the cluster, the one actor class
that runs each batch's whole sampling strategy, and the one Ray Data execution of a run."""
