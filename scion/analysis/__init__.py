"""Looking inside models and runs: attention degeneration (lazy layers, `scion lazy`) and the
visual report of training runs (`scion report`). Nothing here knows about training."""
