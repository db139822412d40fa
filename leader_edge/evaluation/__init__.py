"""Scoring (Jaccard, PRAUC, F1, DDI rate), the frequency baseline and the seeds/paired-interval report."""
