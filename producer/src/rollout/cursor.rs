//! Walking the inventory in order, one device at a time, so an inventory of
//! any size is rolled out in constant memory.

use crate::ProducerError;
use flotilla_common::{Device, inventory::InventoryReader};
use std::{collections::HashSet, fs::File, io::BufReader, path::Path};

pub struct Cursor {
    reader: InventoryReader<BufReader<File>>,
    /// Only these devices belong to the campaign (a retry of failures).
    only: Option<HashSet<String>>,
    /// Position of the next device among those that belong.
    index: u64,
    peeked: Option<(u64, Device)>,
    path: String,
}

impl Cursor {
    pub fn open(path: &Path, only: Option<HashSet<String>>) -> Result<Cursor, ProducerError> {
        let file = File::open(path).map_err(|source| ProducerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let reader = InventoryReader::new(BufReader::new(file))
            .map_err(|e| ProducerError::InventoryChanged(e.to_string()))?;
        Ok(Cursor {
            reader,
            only,
            index: 0,
            peeked: None,
            path: path.display().to_string(),
        })
    }

    /// The next device of the campaign and its position, without taking it.
    pub fn peek(&mut self) -> Result<Option<&(u64, Device)>, ProducerError> {
        if self.peeked.is_none() {
            self.peeked = self.read()?;
        }
        Ok(self.peeked.as_ref())
    }

    pub fn next_device(&mut self) -> Result<Option<(u64, Device)>, ProducerError> {
        match self.peeked.take() {
            Some(device) => Ok(Some(device)),
            None => self.read(),
        }
    }

    fn read(&mut self) -> Result<Option<(u64, Device)>, ProducerError> {
        while let Some(row) = self.reader.next_device() {
            // The file was checked before; a bad row now means it changed.
            let device = row.map_err(|errors| {
                let text: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}: {e}", self.path))
                    .collect();
                ProducerError::InventoryChanged(text.join("; "))
            })?;
            if self
                .only
                .as_ref()
                .is_some_and(|only| !only.contains(&device.id))
            {
                continue;
            }
            let index = self.index;
            self.index += 1;
            return Ok(Some((index, device)));
        }
        Ok(None)
    }
}
