"""The App API: the marketplace-facing service (call, result, stats, webhooks)."""
