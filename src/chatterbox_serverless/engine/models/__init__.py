"""One file per network component; attribute names mirror the official checkpoint keys."""
