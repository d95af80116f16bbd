# What the examples' run.sh scripts share, sourced by them (not run on its own):
#
#   example_out_dir NAME [OUT_DIR]   sets OUT: OUT_DIR made absolute from the caller's directory,
#                                    or runs/NAME in the repository; a usage line and exit 2 for more
#   start_example TITLE              sets TIMES and LOAD_AT_START, prints the header lines
#   stage NAME COMMAND...            runs COMMAND under a header, appends "NAME<TAB>start<TAB>end"
#                                    (Unix seconds) to $TIMES, the file the example's report.py reads
#
# ROOT (the repository) must be set first.

example_out_dir() {
    local name=$1
    shift
    if [[ $# -gt 1 ]]; then
        echo "usage: bash examples/$name/run.sh [OUT_DIR]" >&2
        exit 2
    fi
    if [[ $# -eq 1 ]]; then
        mkdir -p "$1"
        OUT="$(cd "$1" && pwd)"  # absolute, from the caller's directory, before the script cds to ROOT
    else
        OUT="$ROOT/runs/$name"
    fi
}

now() { python -c 'import time; print(f"{time.time():.3f}")'; }

start_example() {
    TIMES="$OUT/stage_times.tsv"
    # The load before any of our work: other processes on the machine slow every stage down.
    LOAD_AT_START=$(python -c 'import os; print(f"{os.getloadavg()[0]:.2f}")')
    echo "nanotune $1 -> $OUT (load average $LOAD_AT_START)"
    echo "python: $(command -v python) ($(python -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'))"
}

stage() {
    local name=$1
    shift
    echo
    echo "=== [$name] $(date +%H:%M:%S)"
    local start
    start=$(now)
    "$@"
    printf '%s\t%s\t%s\n' "$name" "$start" "$(now)" >>"$TIMES"
}
