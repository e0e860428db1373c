"""qaft.reporting: the papers' tables, plots and paper-vs-reproduced comparisons from run records."""
