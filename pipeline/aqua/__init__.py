"""Everything that speaks Zuora's AQuA API: models, the async client and the local simulator."""
