"""Monitoring a served model: `statistics.py` (reference statistics, PSI / chi2 / KS, rolling windows: numpy only,
the training side uses them too), `log.py` (the prediction log the server writes), `report.py` + `charts.py` (the
offline `monitor` report over that log)."""
