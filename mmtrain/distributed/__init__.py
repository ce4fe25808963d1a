"""Everything that touches DeepSpeed or torch.distributed lives here."""
