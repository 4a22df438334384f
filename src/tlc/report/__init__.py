"""Reports of a run: tables, the network map (and the plots in tlc.io.plots)."""
