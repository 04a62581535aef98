"""inspect and eval: token statistics, artifact detection, probes, reports and pictures. Reads models; never trains."""
