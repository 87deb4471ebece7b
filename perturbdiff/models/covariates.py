"""Covariate encoder: the (context, batch, dataset, perturbation, dose, ...) of a set -> one vector [B, W].

Shape legend: B sets, P perturbations in the vocabulary, F table features, K covariate branches,
D branch width (cov_dim), W model width.

One branch per covariate, each D wide, concatenated and mapped to W by a Linear (the released
``CovEncoder`` with ``gather_strategy: concat``). Every branch has a NULL value: a set whose
covariates are dropped for classifier-free guidance, or whose key is absent from the batch,
gets the NULL of every branch, so "unconditional" is one learned point rather than zeros.

- Categorical (context, batch, dataset; perturbation with encoding "id"): an embedding with one
  extra row at index ``size`` for NULL.
- Perturbation with encoding "table": a fixed feature matrix [P, F] (a buffer, never trained)
  projected by a small MLP, plus a learned NULL vector. A perturbation never seen in training
  still has a meaningful embedding as long as it has a row in the table.
- Numeric (dose, ...; batch key ``num_<name>``): log1p (optionally), then an MLP from one scalar;
  a NaN value means "missing" for that set and gives the learned NULL vector.

Every branch's parameters stay in the autograd graph whatever the batch holds (NULL rows are
selected with ``torch.where`` after the MLP, on sanitised input), so distributed engines never see
unused parameters and a NaN never reaches a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.batch import CATEGORICAL, numeric_key

ENCODINGS = ("id", "table")
# a categorical id meaning "a label the vocabulary lacks": that set's NULL token. Not -1, which is what
# a missing pandas category codes to, so that such a bug stays an error
UNSEEN_ID = -(2**31)


class CovariateEncoder(nn.Module):
    """Embed a batch's covariates (a dict of [B] tensors) into the model width.

    Args:
        vocab_sizes: number of categories per categorical covariate (keys among ``CATEGORICAL``);
            a key that is absent or has size 0 gets no branch.
        width: W, the output width.
        cov_dim: D, the width of every branch.
        numeric: names of numeric covariates, read from the batch keys ``num_<name>``.
        log_numeric: feed numeric values as log1p(value).
        perturbation_encoding: "id" (a learned embedding per perturbation) or "table".
        perturbation_features: [P, F] float features, one row per perturbation id (encoding
            "table" only; required there).
    """

    def __init__(self, vocab_sizes: Mapping[str, int], *, width: int, cov_dim: int = 128,
                 numeric: Sequence[str] = (), log_numeric: bool = True, perturbation_encoding: str = "id",
                 perturbation_features: Tensor | None = None) -> None:
        super().__init__()
        unknown = sorted(set(vocab_sizes) - set(CATEGORICAL))
        if unknown:
            raise ValueError(f"unknown categorical covariates {unknown}; valid: {', '.join(CATEGORICAL)}")
        if perturbation_encoding not in ENCODINGS:
            raise ValueError(f"perturbation_encoding must be one of {ENCODINGS}, got '{perturbation_encoding}'")
        sizes = {name: int(vocab_sizes.get(name, 0)) for name in CATEGORICAL}
        for name, size in sizes.items():
            if size < 0:
                raise ValueError(f"vocab size of '{name}' must be >= 0, got {size}")
        self.width, self.cov_dim, self.log_numeric = width, cov_dim, log_numeric
        self.perturbation_encoding = perturbation_encoding
        self.use_table = perturbation_encoding == "table"

        # Perturbation table (a fixed buffer: it travels with the checkpoint but is not trained)
        self.perturbation_mlp: nn.Module | None = None
        if self.use_table:
            if perturbation_features is None:
                raise ValueError("perturbation_encoding='table' needs perturbation_features [P, F] "
                                 "(see load_perturbation_table)")
            feats = torch.as_tensor(perturbation_features, dtype=torch.float32)
            if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
                raise ValueError(f"perturbation_features must be a non-empty [P, F] matrix, got {tuple(feats.shape)}")
            if not torch.isfinite(feats).all():
                raise ValueError("perturbation_features contain NaN or infinite values")
            if sizes["perturbation"] not in (0, feats.shape[0]):
                raise ValueError(f"perturbation vocabulary has {sizes['perturbation']} entries but the "
                                 f"feature table has {feats.shape[0]} rows; they must match")
            sizes["perturbation"] = feats.shape[0]
            self.register_buffer("perturbation_features", feats)  # [P, F]
            self.perturbation_mlp = nn.Sequential(nn.Linear(feats.shape[1], cov_dim), nn.SiLU(),
                                                  nn.Linear(cov_dim, cov_dim))
            self.perturbation_null = nn.Parameter(torch.zeros(cov_dim))
        elif perturbation_features is not None:
            raise ValueError("perturbation_features were given but perturbation_encoding is 'id'")
        self.vocab_sizes = {name: size for name, size in sizes.items() if size > 0}

        # Categorical id embeddings: row `size` is NULL
        self.embeddings = nn.ModuleDict({
            name: nn.Embedding(size + 1, cov_dim) for name, size in self.vocab_sizes.items()
            if not (name == "perturbation" and self.use_table)})

        # Numeric covariates: scalar -> D, plus a learned NULL vector each
        if len(set(numeric)) != len(numeric):
            raise ValueError(f"numeric covariates repeat a name: {list(numeric)}")
        self.numeric = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(1, cov_dim), nn.SiLU(), nn.Linear(cov_dim, cov_dim)) for name in numeric})
        self.numeric_null = nn.ParameterDict({name: nn.Parameter(torch.zeros(cov_dim)) for name in numeric})

        self.branch_names = [*self.embeddings, *(["perturbation"] if self.use_table else []), *self.numeric]
        num_branches = len(self.branch_names)
        self.combine = nn.Linear(num_branches * cov_dim, width) if num_branches else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=0.02)
        for p in [*self.numeric_null.values(), *([self.perturbation_null] if self.use_table else [])]:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # -----------------------------------------------------------------------------------------

    def forward(self, cov: Mapping[str, Tensor], drop: Tensor | None = None, *,
                batch_size: int | None = None) -> Tensor:
        """Embed the covariates of B sets.

        Args:
            cov: ids as int64 [B] (0-based codes; UNSEEN_ID: NULL for that set, a label the
                vocabulary lacks) under the categorical names, floats [B] under ``num_<name>``;
                other keys are ignored; an absent key means NULL for every set.
            drop: bool [B]; True replaces every covariate of that set with NULL (classifier-free
                guidance).
            batch_size: B, needed only when neither ``drop`` nor any covariate is given.

        Returns:
            [B, W] conditioning vector (zeros when the encoder has no branch).

        Raises:
            ValueError: a covariate of the wrong shape or dtype, or an id outside [0, size) in a
                set that is not dropped (the covariate and the value are named).
        """
        B = self._batch_size(cov, drop, batch_size)
        device = next(iter(self.parameters()), torch.empty(0)).device
        drop = torch.zeros(B, dtype=torch.bool, device=device) if drop is None else drop.to(device)
        if drop.shape != (B,) or drop.dtype != torch.bool:
            raise ValueError(f"drop_cov: expected bool [{B}], got {drop.dtype} {tuple(drop.shape)}")
        if self.combine is None:
            return torch.zeros(B, self.width, device=device, dtype=self._dtype())

        parts = []  # K x [B, D]
        for name, emb in self.embeddings.items():
            ids, null = self._ids(cov, name, drop)  # [B], [B]
            parts.append(emb(ids.masked_fill(null, self.vocab_sizes[name])))
        if self.use_table:
            ids, null = self._ids(cov, "perturbation", drop)
            feats = self.perturbation_features[ids.masked_fill(null, 0)]  # [B, F]
            e = self.perturbation_mlp(feats.to(self._dtype()))
            parts.append(torch.where(null[:, None], self.perturbation_null.to(e.dtype), e))
        for name, mlp in self.numeric.items():
            value, null = self._numeric(cov, name, drop)  # [B], [B]
            e = mlp(value[:, None].to(self._dtype()))
            parts.append(torch.where(null[:, None], self.numeric_null[name].to(e.dtype), e))
        dtype = self._dtype()  # branches may differ under autocast; the Linear casts again anyway
        return self.combine(torch.cat([p.to(dtype) for p in parts], dim=-1))  # [B, K*D] -> [B, W]

    # -----------------------------------------------------------------------------------------

    def _dtype(self) -> torch.dtype:
        return self.combine.weight.dtype if self.combine is not None else torch.get_default_dtype()

    def _batch_size(self, cov: Mapping[str, Tensor], drop: Tensor | None, batch_size: int | None) -> int:
        if drop is not None:
            return int(drop.shape[0])
        if batch_size is not None:
            return int(batch_size)
        for key in [*self.vocab_sizes, *(numeric_key(n) for n in self.numeric)]:
            if key in cov:
                return int(cov[key].shape[0])
        raise ValueError("cannot tell the batch size: pass drop or batch_size when no covariate is given")

    def _ids(self, cov: Mapping[str, Tensor], name: str, drop: Tensor) -> tuple[Tensor, Tensor]:
        """Validated ids [B] (0 where NULL) and the NULL mask [B] of one categorical covariate."""
        B, size = drop.shape[0], self.vocab_sizes[name]
        if name not in cov:
            return torch.zeros(B, dtype=torch.long, device=drop.device), torch.ones_like(drop)
        ids = cov[name]
        if ids.shape != (B,):
            raise ValueError(f"covariate '{name}': expected shape ({B},), got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"covariate '{name}': expected integer ids, got {ids.dtype}")
        ids = ids.to(device=drop.device, dtype=torch.long)
        null = drop | (ids == UNSEEN_ID)
        bad = ~null & ((ids < 0) | (ids >= size))
        if bad.any():  # an out-of-range id would be a device-side assert on GPU; say which one here
            raise ValueError(f"covariate '{name}': id {int(ids[bad][0])} outside [0, {size})")
        return ids.masked_fill(null, 0), null

    def _numeric(self, cov: Mapping[str, Tensor], name: str, drop: Tensor) -> tuple[Tensor, Tensor]:
        """Sanitised (log1p) values [B] (0 where NULL) and the NULL mask [B] of one numeric covariate."""
        key, B = numeric_key(name), drop.shape[0]
        if key not in cov:
            return torch.zeros(B, device=drop.device), torch.ones_like(drop)
        value = cov[key]
        if value.shape != (B,):
            raise ValueError(f"covariate '{key}': expected shape ({B},), got {tuple(value.shape)}")
        value = value.to(device=drop.device, dtype=torch.float64 if value.dtype == torch.float64 else torch.float32)
        null = drop | torch.isnan(value)  # NaN = missing for that set
        value = value.masked_fill(null, 0.0)  # never let NaN into the MLP (0 * NaN poisons weight grads)
        if torch.isinf(value).any():
            raise ValueError(f"covariate '{key}' has infinite values")
        if self.log_numeric:
            if (value <= -1).any():
                raise ValueError(f"covariate '{key}' has values <= -1, which log1p cannot take "
                                 f"(min {float(value.min())}); set model.log_numeric=false for signed values")
            value = torch.log1p(value)
        return value, null


def load_perturbation_table(path: str | Path, vocabulary: Sequence[str]) -> Tensor:
    """Read a perturbation feature table, rows ordered to match ``vocabulary``.

    The parquet file has a string column ``perturbation`` and one numeric column per feature
    (e.g. a drug's ChemBERTa embedding or a gene's GenePT embedding); extra rows are ignored.

    Returns:
        float32 [P, F], row i the features of ``vocabulary[i]``.

    Raises:
        ValueError: no ``perturbation`` column, duplicated names, no feature column, a non-numeric
            feature column or one with missing values (named), or vocabulary entries absent from
            the table (the file and up to 10 missing names are given).
    """
    import pandas as pd

    path = Path(path)
    table = pd.read_parquet(path)
    if "perturbation" not in table.columns:
        raise ValueError(f"{path}: no 'perturbation' column (columns: {list(table.columns)[:10]})")
    names = table["perturbation"].astype(str)
    dups = names[names.duplicated()].unique().tolist()
    if dups:
        raise ValueError(f"{path}: perturbations listed more than once: {dups[:10]}")
    features = table.drop(columns=["perturbation"])
    if features.shape[1] == 0:
        raise ValueError(f"{path}: no feature columns besides 'perturbation'")
    for col in features.columns:
        if not pd.api.types.is_numeric_dtype(features[col]):
            raise ValueError(f"{path}: feature column '{col}' is not numeric ({features[col].dtype})")
        if features[col].isna().any():
            raise ValueError(f"{path}: feature column '{col}' has missing values")
    row = {name: i for i, name in enumerate(names)}
    missing = [v for v in vocabulary if v not in row]
    if missing:
        raise ValueError(f"{path}: {len(missing)} perturbation(s) of the vocabulary have no row in the table, "
                         f"e.g. {missing[:10]}")
    values = features.to_numpy(dtype="float32")[[row[v] for v in vocabulary]]
    return torch.from_numpy(values)
