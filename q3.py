import sys, json, time
sys.path.insert(0, '/work/shared/tools')
from qmp_backup import QMP
q = QMP('/tmp/incr/qmp.sock')
def show(*a, **k):
    try:
        r = q.cmd(*a, **k)
    except Exception as e:
        r = repr(e)
    print(a[0], json.dumps(k)[:300], '->', json.dumps(r)[:600])
    return r
def bitmaps():
    for n in q.cmd('query-named-block-nodes', flat=True):
        if n.get('dirty-bitmaps'): print('  ', n['node-name'], json.dumps(n.get('dirty-bitmaps')))
bitmaps()
show('blockdev-add', driver='nbd', **{'node-name':'t'}, server={'type':'unix','path':'/tmp/incr/n.sock'}, export='')
show('transaction', actions=[
  {'type':'block-dirty-bitmap-add','data':{'node':'a','name':'p2','granularity':65536,'persistent':True}},
  {'type':'blockdev-backup','data':{'job-id':'j','device':'a','target':'t','sync':'bitmap','bitmap':'p1','bitmap-mode':'never'}}])
bitmaps()
t=time.time()
while time.time()-t < 5:
    m = q._read(0.5)
    if m and 'event' in m: print(m['event'], json.dumps(m.get('data'))[:200])
bitmaps()
show('blockdev-del', **{'node-name':'t'})
