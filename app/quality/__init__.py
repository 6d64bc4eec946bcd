"""Live model quality: prediction ids, ground-truth feedback and the scores computed from it."""
