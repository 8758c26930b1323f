"""The outputs of the streaming loop: a checkpoint folder, a LoRA adapter, one folder per skeleton.
(``analyze``'s statistics are a sink too: :class:`omnimerge.analysis.stats.StatisticsOutput`.)"""
