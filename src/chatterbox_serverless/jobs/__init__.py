"""Jobs: the store (SQLite or Redis behind one interface), the batch claimer, the worker."""
