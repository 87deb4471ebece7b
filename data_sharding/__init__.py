"""Converters from source datasets (Tahoe-100M parquet, h5ad) into the PerturbDiff cell store."""
