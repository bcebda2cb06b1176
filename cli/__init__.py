"""The `bmoe` command line: the top of the import picture. It imports pipelines/ and serving/;
nothing imports it (pipelines/ never imports serving/, serving/ imports pipelines/)."""
