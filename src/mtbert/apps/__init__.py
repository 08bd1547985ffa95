"""Applications: the command line, the HTTP server and page, the HTML report, the ablation runner."""
