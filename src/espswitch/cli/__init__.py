"""Command-line tools: espswitch start|stop|demo|esp."""
