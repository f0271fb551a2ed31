"""Change streams: the journal tailer (hub), subscriptions, and the cross-process bus."""
