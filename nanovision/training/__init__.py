"""Training for nanovision: the stages on the HF Trainer, sequence packing (`bin_packing`, `dataset_packing`,
`collator`), Muon, evaluation and the quickstart."""
