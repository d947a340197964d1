"""Evaluation: the Evaluator (IW-NLL, sample metrics per K), metrics, the classifier, BN re-estimation
and the report files (metrics.json/csv/md, per_item.csv, metrics_vs_k.png). Imports the training and
model wings, never jobs."""
