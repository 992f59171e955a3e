//! The EFI system partition, written with the `fatfs` crate: systemd-boot as the
//! removable-media path (`EFI/BOOT/BOOTX64.EFI`, which firmware boots with no NVRAM
//! entry), the kernel, the initrd and one loader entry.

use super::{io_err, ImageError};
use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

pub(crate) struct EspFiles<'a> {
    pub bootloader: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub entry_title: String,
    pub cmdline: String,
}

/// FAT timestamps from the build epoch, so the ESP is byte-identical across builds.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn fat_time(epoch: u64) -> fatfs::DateTime {
    let (y, m, d) = civil_from_days((epoch / 86_400) as i64);
    // FAT dates start in 1980 and end in 2107.
    let y = y.clamp(1980, 2107) as u16;
    let s = epoch % 86_400;
    fatfs::DateTime {
        date: fatfs::Date {
            year: y,
            month: m as u16,
            day: d as u16,
        },
        time: fatfs::Time {
            hour: (s / 3600) as u16,
            min: (s / 60 % 60) as u16,
            sec: (s % 60) as u16,
            millis: 0,
        },
    }
}

/// Bytes the ESP needs for these files, with room for a second kernel and initrd of
/// similar size (a later in-place update) and FAT overhead; at least 64 MiB.
pub(crate) fn size_for(files: &EspFiles<'_>) -> Result<u64, ImageError> {
    let mut total = 0u64;
    for p in [files.bootloader, files.kernel, files.initrd] {
        total += fs::metadata(p)
            .map_err(io_err(format!("cannot stat {}", p.display())))?
            .len();
    }
    let want = total * 2 + 8 * 1024 * 1024;
    Ok(want.max(64 * 1024 * 1024).div_ceil(1 << 20) << 20)
}

/// Writes a formatted ESP of `size` bytes into `disk` at `offset`.
pub(crate) fn write(
    disk: &mut fs::File,
    offset: u64,
    size: u64,
    volume_id: u32,
    files: &EspFiles<'_>,
    epoch: u64,
) -> Result<(), ImageError> {
    let ferr = |what: &str| io_err(format!("ESP: {what}"));
    let part = Window::new(disk, offset, size)?;
    let mut part = io::BufWriter::with_capacity(1 << 20, part);
    fatfs::format_volume(
        BufRw(&mut part),
        fatfs::FormatVolumeOptions::new()
            .volume_id(volume_id)
            .volume_label(*b"ESP        "),
    )
    .map_err(ferr("cannot format"))?;
    let time: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(epoch))));
    {
        let fs = fatfs::FileSystem::new(
            BufRw(&mut part),
            fatfs::FsOptions::new()
                .time_provider(time)
                .update_accessed_date(false),
        )
        .map_err(ferr("cannot open"))?;
        let root = fs.root_dir();
        for d in ["EFI", "EFI/BOOT", "loader", "loader/entries", "imgbuild"] {
            root.create_dir(d)
                .map_err(ferr(&format!("cannot create {d}")))?;
        }
        let put = |name: &str, mut src: Box<dyn io::Read + '_>| -> Result<(), ImageError> {
            let mut f = root
                .create_file(name)
                .map_err(ferr(&format!("cannot create {name}")))?;
            f.truncate().map_err(ferr(name))?;
            io::copy(&mut src, &mut f).map_err(ferr(&format!("cannot write {name}")))?;
            f.flush().map_err(ferr(name))?;
            Ok(())
        };
        let open = |p: &Path| -> Result<Box<dyn io::Read>, ImageError> {
            Ok(Box::new(io::BufReader::new(fs::File::open(p).map_err(
                io_err(format!("cannot open {}", p.display())),
            )?)))
        };
        put("EFI/BOOT/BOOTX64.EFI", open(files.bootloader)?)?;
        put("imgbuild/vmlinuz", open(files.kernel)?)?;
        put("imgbuild/initrd.img", open(files.initrd)?)?;
        // timeout 0: no menu on a server console; `editor no`: the kernel command line
        // cannot be changed from the console without the disk.
        let loader = "default imgbuild.conf\ntimeout 0\neditor no\n";
        put("loader/loader.conf", Box::new(loader.as_bytes()))?;
        let entry = format!(
            "title {}\nlinux /imgbuild/vmlinuz\ninitrd /imgbuild/initrd.img\noptions {}\n",
            files.entry_title, files.cmdline
        );
        put("loader/entries/imgbuild.conf", Box::new(entry.as_bytes()))?;
        drop(root);
        fs.unmount().map_err(ferr("cannot finish"))?;
    }
    part.flush().map_err(ferr("flush"))?;
    Ok(())
}

/// A byte window of the disk file, so fatfs writes straight into the partition.
struct Window<'a> {
    f: &'a mut fs::File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a> Window<'a> {
    fn new(f: &'a mut fs::File, start: u64, len: u64) -> Result<Self, ImageError> {
        f.seek(SeekFrom::Start(start))
            .map_err(io_err("ESP: cannot seek"))?;
        Ok(Window {
            f,
            start,
            len,
            pos: 0,
        })
    }
}

impl io::Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.len.saturating_sub(self.pos) as usize;
        let n = buf.len().min(room);
        if n == 0 {
            return Ok(0);
        }
        let r = self.f.read(&mut buf[..n])?;
        self.pos += r as u64;
        Ok(r)
    }
}

impl io::Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.len.saturating_sub(self.pos) as usize;
        if room == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the ESP",
            ));
        }
        let n = buf.len().min(room);
        let w = self.f.write(&buf[..n])?;
        self.pos += w as u64;
        Ok(w)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.f.flush()
    }
}

impl io::Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the ESP",
            ));
        }
        self.pos = new as u64;
        self.f.seek(SeekFrom::Start(self.start + self.pos))?;
        Ok(self.pos)
    }
}

/// fatfs wants Read + Write + Seek on one object; BufWriter only writes, so reads go
/// to the inner window after flushing.
struct BufRw<'a, 'b>(&'a mut io::BufWriter<Window<'b>>);

impl io::Read for BufRw<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.flush()?;
        self.0.get_mut().read(buf)
    }
}
impl io::Write for BufRw<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl io::Seek for BufRw<'_, '_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.0.seek(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_to_fat_date() {
        let t = fat_time(1_735_689_600);
        assert_eq!((t.date.year, t.date.month, t.date.day), (2025, 1, 1));
        let t = fat_time(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (1, 1, 1));
    }
}
