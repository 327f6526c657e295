//! Placeholder so the driver compiles before the world lands; the world's
//! author's file replaces it on merge.
use std::io;
use std::os::fd::RawFd;

pub struct World;

#[derive(Clone)]
pub struct SimIo;

impl ublk_ploop::io::Io for SimIo {
    async fn read_at(&self, _: RawFd, _: &mut [u8], _: u64) -> io::Result<()> {
        todo!()
    }
    async fn write_at(&self, _: RawFd, _: &[u8], _: u64) -> io::Result<()> {
        todo!()
    }
    async fn sync_data(&self, _: RawFd) -> io::Result<()> {
        todo!()
    }
    async fn allocate(&self, _: RawFd, _: u64, _: u64) -> io::Result<()> {
        todo!()
    }
    async fn punch_hole(&self, _: RawFd, _: u64, _: u64) -> io::Result<()> {
        todo!()
    }
    async fn set_len(&self, _: RawFd, _: u64) -> io::Result<()> {
        todo!()
    }
}
