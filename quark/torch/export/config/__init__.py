"""Export settings: ``ExporterConfig``, ``JsonExporterConfig``, ``OnnxExporterConfig``."""
