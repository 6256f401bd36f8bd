"""Training-loop plugins: progress, filter distance, ticket-emergence detectors (docs/plugins.md)."""
