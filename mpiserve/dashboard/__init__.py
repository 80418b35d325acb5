"""What rank 0 shows about a running job: a collector makes frozen snapshots from the engines'
stats and the batch tally, a pure view renders them, an observer shows them and writes the run
report at the end."""
