"""The LoRA paper's section 7 on your own adapters (Hu et al., 2021).

- `subspace_similarity`: how much the subspaces that two adapters' factors
  span overlap (§7.2, Fig. 3-4), for adapters of different ranks or seeds;
- `amplification_factor`: how ΔW relates to W (§7.3, Table 7);
- `spectrum` / `effective_rank`: the singular values of each ΔW;
- `plot_similarity` / `plot_spectrum`: PNG figures (needs matplotlib:
  `pip install "keras-lora[analysis]"`).

NumPy maths on the factors, so results are the same on every backend.
"""

from keras_lora.analysis.amplification import amplification_factor
from keras_lora.analysis.plots import plot_similarity, plot_spectrum
from keras_lora.analysis.spectrum import effective_rank, spectrum
from keras_lora.analysis.subspace import subspace_similarity

__all__ = [
    "amplification_factor",
    "effective_rank",
    "plot_similarity",
    "plot_spectrum",
    "spectrum",
    "subspace_similarity",
]
