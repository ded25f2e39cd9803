"""What operators watch: Prometheus metrics of the workers (`metrics`), the fleet-wide gauges
`dq metrics` serves (`exporter`: queue depths, dead letters, jobs by status), and the opt-in
traces (LangSmith run trees, OpenTelemetry spans)."""
