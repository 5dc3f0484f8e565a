"""Jobs: the store (SQLite or Redis behind one interface), the scheduler that forms batches, the worker."""
