"""The dataset format (visits.csv, codes.csv, ddi.csv), the splits, and what writes one: MIMIC sources and the synthetic generator."""
