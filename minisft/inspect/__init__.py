"""Looking inside: the module tree with shapes, FLOPs and memory (summary), and pictures of
the graph, attention and training curves (viz)."""
