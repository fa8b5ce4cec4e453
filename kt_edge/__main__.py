from kt_edge.cli import app

app(prog_name="kt-edge")
