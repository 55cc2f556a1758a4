"""Model families built on minisft.nn."""
