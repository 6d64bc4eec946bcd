"""Live model quality: input drift against the training split, and scores from ground-truth feedback."""
