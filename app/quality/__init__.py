"""Live model quality: prediction ids, ground-truth feedback and the scores computed from it, and input drift
against the training split."""
