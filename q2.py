import sys, json, time
sys.path.insert(0, '/work/shared/tools')
from qmp_backup import QMP
q = QMP('/tmp/incr/qmp.sock')
def show(*a, **k):
    try:
        r = q.cmd(*a, **k)
    except Exception as e:
        r = repr(e)
    print(a[0], json.dumps(k)[:200], '->', json.dumps(r)[:600])
    return r
def bitmaps():
    for n in q.cmd('query-named-block-nodes', flat=True):
        if n.get('dirty-bitmaps'): print('  ', n['node-name'], json.dumps(n.get('dirty-bitmaps')))
show('nbd-server-start', addr={'type':'unix','data':{'path':'/tmp/incr/live.sock'}})
show('block-export-add', type='nbd', id='e1', **{'node-name':'a'}, name='live', writable=True)
bitmaps()
