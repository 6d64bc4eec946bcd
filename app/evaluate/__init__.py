"""`/evaluate` and `modelserve evaluate`: score labelled data against a served model, in bounded memory.

`readers` turns a JSON body or a streamed NDJSON / CSV / NPZ upload into chunks of model inputs and
encoded targets; `runner` sends each chunk through the model and keeps only the counts of
`app.scoring`; `routes` is the HTTP endpoint, `worker` the process that scores a streamed upload for it,
and `cli` the command line.
"""
