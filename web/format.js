// How sizes, speeds and durations read on the page.

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];

export function bytes(n) {
  if (!Number.isFinite(n)) return '';
  let v = n;
  let u = 0;
  while (v >= 1024 && u < UNITS.length - 1) { v /= 1024; u++; }
  if (u === 0) return `${n} ${n === 1 ? 'byte' : 'bytes'}`;
  return `${v.toFixed(v < 10 ? 1 : 0)} ${UNITS[u]}`;
}

export function speed(bytesPerSecond) {
  if (!(bytesPerSecond > 0)) return '';
  return `${bytes(Math.round(bytesPerSecond))}/s`;
}

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '';
  const s = Math.ceil(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// "12.0 MiB of 20.0 MiB, 3.1 MiB/s, 3 s left"
export function progressLine(done, total, rate) {
  const parts = [`${bytes(done)} of ${bytes(total)}`];
  if (rate > 0 && done < total) {
    parts.push(speed(rate));
    parts.push(`${duration((total - done) / rate)} left`);
  }
  return parts.join(', ');
}
