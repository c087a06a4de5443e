/** uid/gid from a number or a local user/group name (/etc/passwd, /etc/group). */
import { readFileSync } from 'node:fs';
import { invalidArg } from '../lib/sys/errors';

function lookup(file: string, name: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  for (const line of text.split('\n')) {
    const [n, , id] = line.split(':');
    if (n === name && id !== undefined && /^\d+$/.test(id)) return Number(id);
  }
  return undefined;
}

export function resolveId(value: string, kind: 'owner' | 'group'): number {
  if (/^\d+$/.test(value)) return Number(value);
  const id = lookup(kind === 'owner' ? '/etc/passwd' : '/etc/group', value);
  if (id === undefined)
    throw invalidArg(`${kind} "${value}" is not a number and no local ${kind === 'owner' ? 'user' : 'group'} has that name`, `give a numeric ${kind === 'owner' ? 'uid' : 'gid'}`);
  return id;
}
