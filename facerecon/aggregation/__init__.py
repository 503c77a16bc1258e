"""One identity from a person's photo set: albums, consistency checks, mean and joint aggregation."""
